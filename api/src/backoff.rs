//! The one back-off schedule every retry in Bramble uses: container restarts, the
//! agent's redials, reconcile and cron retries, webhook deliveries.
//!
//! Pure: the attempt number and, for jitter, a random fraction are arguments, so every
//! schedule is unit-tested without a clock or a random source.

use std::time::Duration;

/// Exponential back-off: `initial × 2^(n-1)` before attempt `n + 1`, never more than
/// `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The wait after the first failure.
    pub initial: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Backoff {
    /// A schedule from `initial` up to `max`. A `max` below `initial` caps every wait at
    /// `max`.
    pub const fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff { initial, max }
    }

    /// The wait after the `n`-th consecutive failure (n ≥ 1; 0 counts as 1):
    /// `initial × 2^(n-1)`, capped at `max`. Saturates instead of overflowing, whatever
    /// `n` is.
    pub fn delay(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// [`Backoff::delay`] plus up to `spread` of it more, `unit` (in `[0, 1)`, from the
    /// caller's random source) choosing where: many clients that failed together do not
    /// all retry at the same instant. A `unit` outside `[0, 1)` is clamped into it.
    pub fn jittered(&self, n: u32, spread: f64, unit: f64) -> Duration {
        let base = self.delay(n);
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let spread = if spread.is_finite() {
            spread.max(0.0)
        } else {
            0.0
        };
        base.saturating_add(base.mul_f64(spread * unit))
    }
}

/// A running count of consecutive failures against a [`Backoff`], for loops that retry:
/// `failed()` gives the next wait, `succeeded()` starts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    schedule: Backoff,
    failures: u32,
}

impl Retry {
    /// No failures yet.
    pub const fn new(schedule: Backoff) -> Retry {
        Retry {
            schedule,
            failures: 0,
        }
    }

    /// Counts a failure; returns how long to wait before the next attempt.
    pub fn failed(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.schedule.delay(self.failures)
    }

    /// Counts a failure; returns the wait with up to `spread` of it added, `unit`
    /// choosing where (see [`Backoff::jittered`]).
    pub fn failed_jittered(&mut self, spread: f64, unit: f64) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.schedule.jittered(self.failures, spread, unit)
    }

    /// The attempt worked: the next failure waits `initial` again.
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn doubles_from_initial_up_to_the_cap() {
        let b = Backoff::new(ms(100), ms(1000));
        let got: Vec<Duration> = (0..=6).map(|n| b.delay(n)).collect();
        assert_eq!(
            got,
            [
                ms(100),
                ms(100),
                ms(200),
                ms(400),
                ms(800),
                ms(1000),
                ms(1000)
            ]
        );
    }

    #[test]
    fn never_overflows() {
        let b = Backoff::new(Duration::from_secs(u64::MAX / 2), Duration::MAX);
        assert_eq!(b.delay(u32::MAX), Duration::MAX);
        let b = Backoff::new(ms(1), Duration::from_secs(60));
        assert_eq!(b.delay(40), Duration::from_secs(60));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn a_cap_below_initial_caps_everything() {
        let b = Backoff::new(ms(500), ms(100));
        assert_eq!(b.delay(1), ms(100));
    }

    #[test]
    fn jitter_adds_at_most_the_spread() {
        let b = Backoff::new(ms(100), ms(1000));
        assert_eq!(b.jittered(1, 0.5, 0.0), ms(100));
        assert_eq!(b.jittered(1, 0.5, 0.5), ms(125));
        let near_double = b.jittered(3, 1.0, 0.999_999);
        assert!(
            near_double > ms(799) && near_double < ms(800),
            "{near_double:?}"
        );
        assert_eq!(b.jittered(1, 0.5, 7.0), ms(150), "clamped to 1");
        assert_eq!(b.jittered(1, 0.5, f64::NAN), ms(100));
        assert_eq!(b.jittered(1, f64::INFINITY, 0.5), ms(100));
        assert_eq!(b.jittered(1, -1.0, 0.5), ms(100));
    }

    #[test]
    fn retry_counts_failures_and_starts_over_on_success() {
        let mut r = Retry::new(Backoff::new(ms(100), ms(300)));
        assert_eq!(
            [r.failed(), r.failed(), r.failed()],
            [ms(100), ms(200), ms(300)]
        );
        assert_eq!(r.failures(), 3);
        r.succeeded();
        assert_eq!(r.failed(), ms(100));
    }
}
