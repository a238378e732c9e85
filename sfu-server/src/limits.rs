//! Rate limits: token buckets per client address (REST requests, WebSocket
//! connects) and per signalling session (messages).

use std::net::IpAddr;
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// A token bucket: `rate` tokens a second, holding at most `burst`.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            at: now,
        }
    }

    /// Takes one token; when there is none, how long until there is.
    pub fn take(&mut self, rate: f64, burst: f64, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }

    fn is_full(&self, rate: f64, burst: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens + elapsed * rate >= burst
    }
}

/// Requests a second and burst; a rate of 0 turns the limit off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

impl Rate {
    pub const OFF: Rate = Rate {
        per_second: 0.0,
        burst: 0,
    };

    pub fn is_off(&self) -> bool {
        self.per_second <= 0.0
    }
}

/// One bucket per client address.
pub struct RateLimiter {
    rate: Rate,
    buckets: DashMap<IpAddr, Bucket>,
    /// Addresses never limited (loopback in development mode).
    exempt_loopback: bool,
}

/// Buckets kept before idle (full) ones are swept.
const SWEEP_ABOVE: usize = 10_000;

impl RateLimiter {
    pub fn new(rate: Rate, exempt_loopback: bool) -> RateLimiter {
        RateLimiter {
            rate,
            buckets: DashMap::new(),
            exempt_loopback,
        }
    }

    /// Whether `ip` may make one more request now; if not, when to retry.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.rate.is_off() || (self.exempt_loopback && ip.is_loopback()) {
            return Ok(());
        }
        let burst = self.rate.burst.max(1) as f64;
        if self.buckets.len() > SWEEP_ABOVE {
            // Full buckets carry no state worth keeping: a flood from many
            // addresses cannot grow the table without bound.
            self.buckets
                .retain(|_, b| !b.is_full(self.rate.per_second, burst, now));
        }
        self.buckets
            .entry(ip)
            .or_insert_with(|| Bucket::full(burst, now))
            .take(self.rate.per_second, burst, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::disallowed_methods)]
    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn a_burst_then_the_rate_then_a_retry_time() {
        let now = t0();
        let limiter = RateLimiter::new(
            Rate {
                per_second: 2.0,
                burst: 3,
            },
            false,
        );
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            assert!(limiter.check(a, now).is_ok());
        }
        let wait = limiter.check(a, now).unwrap_err();
        assert!(
            wait > Duration::from_millis(400) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        // Another address has its own bucket.
        assert!(limiter.check(b, now).is_ok());
        // Half a second later one more token has come.
        let later = now + Duration::from_millis(500);
        assert!(limiter.check(a, later).is_ok());
        assert!(limiter.check(a, later).is_err());
    }

    #[test]
    fn off_and_loopback_exemption() {
        let now = t0();
        let off = RateLimiter::new(Rate::OFF, false);
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..1000 {
            assert!(off.check(lo, now).is_ok());
        }
        let dev = RateLimiter::new(
            Rate {
                per_second: 1.0,
                burst: 1,
            },
            true,
        );
        for _ in 0..10 {
            assert!(dev.check(lo, now).is_ok());
        }
        let other: IpAddr = "192.0.2.9".parse().unwrap();
        assert!(dev.check(other, now).is_ok());
        assert!(dev.check(other, now).is_err());
    }
}
