//! Extending wrapping wire counters (16-bit RTP sequence numbers, 32-bit
//! timestamps) to 64-bit values that only compare, never wrap.
//!
//! Everything downstream works on extended values; raw `u16`/`u32` are
//! compared nowhere else.

/// Extends a counter of `BITS` bits to a monotonic `u64`, choosing for each
/// new wire value the candidate closest to the highest value seen so far.
#[derive(Debug, Clone, Default)]
pub struct Extender<const BITS: u32> {
    highest: Option<u64>,
}

/// 16-bit RTP sequence numbers.
pub type SeqExtender = Extender<16>;
/// 32-bit RTP timestamps.
pub type TsExtender = Extender<32>;

impl<const BITS: u32> Extender<BITS> {
    const CYCLE: u64 = 1 << BITS;
    const HALF: u64 = 1 << (BITS - 1);

    pub fn new() -> Self {
        Extender { highest: None }
    }

    /// The extended value of a wire value. The first value lands in cycle 1
    /// so that packets reordered before it still have a place below it.
    pub fn extend(&mut self, wire: u64) -> u64 {
        let value = self.value_of(wire);
        self.accept(value);
        value
    }

    /// The extended value `wire` would get, without taking it in (for a
    /// value to be accepted only once it is known good: an SRTP index
    /// before authentication).
    pub fn value_of(&self, wire: u64) -> u64 {
        let wire = wire & (Self::CYCLE - 1);
        let Some(highest) = self.highest else {
            return Self::CYCLE + wire;
        };
        let cycle = highest & !(Self::CYCLE - 1);
        let mut value = cycle | wire;
        if value + Self::HALF < highest {
            value += Self::CYCLE;
        } else if value > highest + Self::HALF && value >= Self::CYCLE {
            value -= Self::CYCLE;
        }
        value
    }

    /// Takes in an extended value (from [`value_of`](Self::value_of)).
    pub fn accept(&mut self, value: u64) {
        if self.highest.is_none_or(|h| value > h) {
            self.highest = Some(value);
        }
    }

    /// The highest extended value seen.
    pub fn highest(&self) -> Option<u64> {
        self.highest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_extend_across_wrap_and_reorder() {
        let mut e = SeqExtender::new();
        let rows: &[(u16, u64)] = &[
            (65_533, 65_536 + 65_533),
            (65_534, 65_536 + 65_534),
            (65_535, 65_536 + 65_535),
            (0, 2 * 65_536),           // wrap
            (65_534, 65_536 + 65_534), // late packet from before the wrap
            (1, 2 * 65_536 + 1),
            (3, 2 * 65_536 + 3), // loss of 2
            (2, 2 * 65_536 + 2), // reordered
            (3, 2 * 65_536 + 3), // duplicate
        ];
        for (i, (wire, want)) in rows.iter().enumerate() {
            assert_eq!(e.extend(*wire as u64), *want, "row {i}");
        }
        assert_eq!(e.highest(), Some(2 * 65_536 + 3));
    }

    #[test]
    fn reordered_before_first_packet_stays_below_it() {
        let mut e = SeqExtender::new();
        assert_eq!(e.extend(5), 65_536 + 5);
        assert_eq!(e.extend(3), 65_536 + 3);
        let mut e = SeqExtender::new();
        assert_eq!(e.extend(1), 65_536 + 1);
        assert_eq!(e.extend(65_535), 65_535); // just before, across the wrap
    }

    #[test]
    fn timestamps_extend_across_32_bit_wrap() {
        let mut e = TsExtender::new();
        let base = 1u64 << 32;
        assert_eq!(
            e.extend(u32::MAX as u64 - 2999),
            base + u32::MAX as u64 - 2999
        );
        assert_eq!(e.extend(1), 2 * base + 1);
        assert_eq!(e.extend(u32::MAX as u64), base + u32::MAX as u64);
    }
}
