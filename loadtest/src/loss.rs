//! Uplink loss for the load tester: an interceptor on the wire side of the
//! NACK responder drops a share of outgoing RTP, so the packet is buffered
//! for retransmission but never leaves (retransmissions can be lost too).

use std::collections::VecDeque;
use std::time::Instant;

use rtc::interceptor::{Interceptor, Packet, StreamInfo, TaggedPacket};
use rtc::sansio::Protocol;
use rtc::shared::error::Error;

pub struct UplinkLoss {
    rate: f64,
    state: u64,
    read: VecDeque<TaggedPacket>,
    write: VecDeque<TaggedPacket>,
    /// RTP packets dropped so far.
    pub dropped: u64,
}

impl UplinkLoss {
    pub fn new(rate: f64, seed: u64) -> UplinkLoss {
        UplinkLoss {
            rate,
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            read: VecDeque::new(),
            write: VecDeque::new(),
            dropped: 0,
        }
    }

    fn lose(&mut self) -> bool {
        // xorshift64*
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        let r = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11;
        (r as f64 / (1u64 << 53) as f64) < self.rate
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for UplinkLoss {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Error> {
        self.read.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.read.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Error> {
        if matches!(msg.message.packet, Packet::Rtp(_)) && self.lose() {
            self.dropped += 1;
            return Ok(());
        }
        self.write.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.write.pop_front()
    }
}

impl Interceptor for UplinkLoss {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}
