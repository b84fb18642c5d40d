//! Rate limiters for device queues, with Firecracker's semantics: a token
//! bucket for bytes and one for operations, each refilled continuously at
//! its rate (size per refill time), starting full, with an optional
//! one-time burst spent first and never refilled. A request the buckets cannot cover waits (the
//! queue is served again when the tokens are there, by the I/O engine's
//! timer; never busy-waited); one larger than a whole bucket goes when
//! the bucket is full, and empties it.
//!
//! Time is passed in, so the arithmetic is tested without a clock.

use std::time::{Duration, Instant};

/// One limit, as Firecracker's TokenBucket: a bucket of `size` tokens
/// that refills from empty in `refill_time_ms`, and `one_time_burst`
/// extra tokens spent first, once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limit {
    pub size: u64,
    pub refill_time_ms: u64,
    #[serde(default)]
    pub one_time_burst: u64,
}

impl Limit {
    /// The period a bucket holds for [`Limit::per_second`]: short, so the
    /// rate shows over short spans too.
    pub const SPAN_MS: u64 = 100;

    /// `rate` tokens per second: a bucket of 100 ms of them.
    pub fn per_second(rate: u64) -> Limit {
        let size = u128::from(rate) * u128::from(Self::SPAN_MS) / 1000;
        Limit {
            size: (size.min(u128::from(u64::MAX)) as u64).max(1),
            refill_time_ms: Self::SPAN_MS,
            one_time_burst: 0,
        }
    }

    /// Tokens per second (0 for a bucket that never refills).
    pub fn rate(&self) -> u64 {
        if self.refill_time_ms == 0 {
            return 0;
        }
        (u128::from(self.size) * 1000 / u128::from(self.refill_time_ms)).min(u128::from(u64::MAX))
            as u64
    }
}

/// Refilled at `size` tokens per `refill_ns` exactly (no rounding to a
/// whole rate per second: 1 token per 10 s is 1 per 10 s).
#[derive(Clone, Debug)]
struct TokenBucket {
    size: u64,
    refill_ns: u128,
    tokens: u64,
    burst: u64,
    last: Instant,
}

impl TokenBucket {
    fn new(limit: Limit, now: Instant) -> TokenBucket {
        TokenBucket {
            size: limit.size.max(1),
            refill_ns: u128::from(limit.refill_time_ms.max(1)) * 1_000_000,
            tokens: limit.size.max(1),
            burst: limit.one_time_burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let ns = now.saturating_duration_since(self.last).as_nanos();
        let add = ns * u128::from(self.size) / self.refill_ns;
        if add > 0 {
            self.tokens = (u128::from(self.tokens) + add).min(u128::from(self.size)) as u64;
            // Only the time the tokens account for is used up.
            let used = add * self.refill_ns / u128::from(self.size);
            self.last += Duration::from_nanos(used.min(u128::from(u64::MAX)) as u64);
        }
        if self.tokens == self.size {
            self.last = now;
        }
    }

    /// How long until `n` tokens can be taken (zero: now).
    fn wait(&mut self, n: u64, now: Instant) -> Duration {
        self.refill(now);
        let need = n.saturating_sub(self.burst).min(self.size);
        let short = need.saturating_sub(self.tokens);
        if short == 0 {
            return Duration::ZERO;
        }
        let ns = u128::from(short) * self.refill_ns / u128::from(self.size) + 1;
        Duration::from_nanos(ns.min(u128::from(u64::MAX)) as u64)
    }

    /// Take `n` tokens (after [`TokenBucket::wait`] said zero).
    fn take(&mut self, n: u64) {
        let from_burst = n.min(self.burst);
        self.burst -= from_burst;
        self.tokens = self.tokens.saturating_sub(n - from_burst);
    }
}

/// Bytes and operations limits of one queue (either may be absent).
#[derive(Clone, Debug, Default)]
pub struct RateLimiter {
    bytes: Option<TokenBucket>,
    ops: Option<TokenBucket>,
}

impl RateLimiter {
    /// A limiter for `bytes` per second and `ops` per second (`None`:
    /// unlimited).
    pub fn new(bytes: Option<Limit>, ops: Option<Limit>, now: Instant) -> RateLimiter {
        RateLimiter {
            bytes: bytes.map(|l| TokenBucket::new(l, now)),
            ops: ops.map(|l| TokenBucket::new(l, now)),
        }
    }

    /// Whether it limits anything.
    pub fn is_unlimited(&self) -> bool {
        self.bytes.is_none() && self.ops.is_none()
    }

    /// Account one operation of `bytes` at `now`: `Ok` if it may go (its
    /// tokens taken), else how long to wait (nothing taken).
    pub fn consume(&mut self, bytes: u64, now: Instant) -> Result<(), Duration> {
        let wait = [
            self.bytes.as_mut().map(|b| b.wait(bytes, now)),
            self.ops.as_mut().map(|b| b.wait(1, now)),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(Duration::ZERO);
        if !wait.is_zero() {
            return Err(wait);
        }
        if let Some(b) = &mut self.bytes {
            b.take(bytes);
        }
        if let Some(b) = &mut self.ops {
            b.take(1);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// 1000 bytes/s: a bucket of 100 bytes, full at the start; then the
    /// rate, to the byte.
    #[test]
    fn bytes_go_at_the_rate_after_the_first_bucket() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(Some(Limit::per_second(1000)), None, t0);
        assert_eq!(r.consume(100, t0), Ok(()));
        let wait = r.consume(50, t0).unwrap_err();
        assert!(wait > ms(49) && wait <= ms(51), "{wait:?}");
        assert_eq!(r.consume(50, t0 + ms(50)), Ok(()));
        // Over 10 s of simulated time, 10 000 bytes (plus the first bucket).
        let mut now = t0 + ms(50);
        let mut sent = 0;
        while now < t0 + ms(10_050) {
            match r.consume(10, now) {
                Ok(()) => sent += 10,
                Err(w) => now += w,
            }
        }
        assert!((9_990..=10_010).contains(&sent), "{sent}");
    }

    #[test]
    fn the_one_time_burst_is_spent_first_and_never_comes_back() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(
            Some(Limit {
                one_time_burst: 500,
                ..Limit::per_second(1000)
            }),
            None,
            t0,
        );
        assert_eq!(r.consume(500, t0), Ok(())); // the burst
        assert_eq!(r.consume(100, t0), Ok(())); // the bucket
        assert!(r.consume(1, t0).is_err());
        // A second later the bucket is full again, the burst is not.
        assert_eq!(r.consume(100, t0 + ms(1000)), Ok(()));
        assert!(r.consume(100, t0 + ms(1000)).is_err());
    }

    #[test]
    fn operations_are_limited_apart_from_bytes() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(None, Some(Limit::per_second(100)), t0);
        for _ in 0..10 {
            assert_eq!(r.consume(1 << 20, t0), Ok(()));
        }
        let wait = r.consume(1, t0).unwrap_err();
        assert!(wait > ms(9) && wait <= ms(11), "{wait:?}");
    }

    /// A slow bucket refills at its exact rate: 1 token per 10 s.
    #[test]
    fn a_slow_bucket_is_not_rounded_up() {
        let t0 = Instant::now();
        let slow = Limit {
            size: 1,
            refill_time_ms: 10_000,
            one_time_burst: 0,
        };
        let mut r = RateLimiter::new(None, Some(slow), t0);
        assert_eq!(r.consume(0, t0), Ok(()));
        let wait = r.consume(0, t0).unwrap_err();
        assert!(wait > ms(9_999) && wait <= ms(10_001), "{wait:?}");
        assert!(r.consume(0, t0 + ms(5_000)).is_err());
        assert_eq!(r.consume(0, t0 + ms(10_000)), Ok(()));
        // A huge rate neither overflows nor shrinks to nothing.
        assert_eq!(Limit::per_second(u64::MAX).size, u64::MAX / 10);
    }

    /// A request bigger than the bucket waits for a full bucket, then
    /// goes (it cannot wait for tokens the bucket never holds).
    #[test]
    fn a_request_larger_than_the_bucket_goes_when_it_is_full() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(Some(Limit::per_second(1000)), None, t0);
        assert_eq!(r.consume(60, t0), Ok(()));
        let wait = r.consume(10_000, t0).unwrap_err();
        assert!(wait > ms(59) && wait <= ms(61), "{wait:?}");
        assert_eq!(r.consume(10_000, t0 + wait), Ok(()));
        assert!(r.consume(1, t0 + wait).is_err());
    }
}
