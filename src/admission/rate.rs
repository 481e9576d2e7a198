//! The login token bucket of one identity (`max_connect_rate`, `connect_burst`).
//!
//! Part of admission, checked at login before authentication. A login takes a token; when
//! none is left it may *reserve* the next one (the bucket goes negative) and wait until it is
//! due, as long as that is within the allowed wait — so a reconnect storm is spread out
//! rather than bounced back at once — and is refused beyond that. Uses tokio's clock, so
//! tests run it with paused time.

use std::time::Duration;

use tokio::time::Instant;

/// Tokens for logins.
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket of `burst` tokens.
    pub(crate) fn new(burst: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(burst),
            at: now,
        }
    }

    /// Takes a token at `now` under `rate` per second and `burst`. Ok(wait): the login may
    /// proceed after `wait` (zero when a token was there). Err(wait): it would have to wait
    /// longer than `max_wait`, nothing is taken. A rate of 0 means no limit.
    pub(crate) fn take(
        &mut self,
        now: Instant,
        rate: f64,
        burst: u32,
        max_wait: Duration,
    ) -> Result<Duration, Duration> {
        if rate <= 0.0 {
            // Unlimited now; when a limit applies later (damping), it starts with a full burst.
            self.tokens = f64::INFINITY;
            self.at = now;
            return Ok(Duration::ZERO);
        }
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(f64::from(burst.max(1)));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(Duration::ZERO);
        }
        let wait = Duration::from_secs_f64((1.0 - self.tokens) / rate);
        if wait > max_wait {
            return Err(wait);
        }
        self.tokens -= 1.0;
        Ok(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_spaced_then_refused() {
        let t0 = Instant::now();
        let mut b = Bucket::new(2, t0);
        let max = Duration::from_millis(500);
        assert_eq!(b.take(t0, 4.0, 2, max), Ok(Duration::ZERO));
        assert_eq!(b.take(t0, 4.0, 2, max), Ok(Duration::ZERO));
        // 4/s: the next tokens are due 250 ms and 500 ms from now.
        assert_eq!(b.take(t0, 4.0, 2, max), Ok(Duration::from_millis(250)));
        assert_eq!(b.take(t0, 4.0, 2, max), Ok(Duration::from_millis(500)));
        assert!(b.take(t0, 4.0, 2, max).is_err(), "750 ms is beyond the allowed wait");
        // One second later two more are due (the reservations were paid first).
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.take(t1, 4.0, 2, Duration::ZERO), Ok(Duration::ZERO));
        assert_eq!(b.take(t1, 4.0, 2, Duration::ZERO), Ok(Duration::ZERO));
        assert!(b.take(t1, 4.0, 2, Duration::ZERO).is_err());
        assert_eq!(
            b.take(t1, 0.0, 2, Duration::ZERO),
            Ok(Duration::ZERO),
            "rate 0 = no limit"
        );
    }

    #[test]
    fn rate_holds_over_time() {
        let t0 = Instant::now();
        let mut b = Bucket::new(5, t0);
        let mut admitted = 0;
        for ms in 0..10_000u64 {
            // A login attempt every millisecond for 10 s, none may wait.
            if b.take(t0 + Duration::from_millis(ms), 10.0, 5, Duration::ZERO).is_ok() {
                admitted += 1;
            }
        }
        assert!((100..=106).contains(&admitted), "{admitted}");
    }
}
