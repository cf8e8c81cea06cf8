//! Retry delays: exponential in the number of *failed* attempts, with jitter.
//!
//! Runs that did not count (throttled, interrupted by a checkpoint) give back
//! their attempt, so they never lengthen the delay. Pure code, unit-tested.

use std::time::Duration;

/// Exponential backoff with multiplicative jitter.
///
/// The delay after the `n`-th failed attempt is `base * 2^(n-1)`, capped at
/// `max`, then multiplied by a random factor in `[1 - jitter, 1 + jitter]` so
/// that tasks failing together do not retry together.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay after the first failure.
    pub base: Duration,
    /// Upper bound before jitter.
    pub max: Duration,
    /// Relative jitter, between 0 and 1.
    pub jitter: f64,
}

impl Backoff {
    /// Default delay after the first failure.
    pub const DEFAULT_BASE: Duration = Duration::from_secs(1);
    /// Default cap.
    pub const DEFAULT_MAX: Duration = Duration::from_secs(3600);
    /// Default jitter (±10 %).
    pub const DEFAULT_JITTER: f64 = 0.1;

    /// The delay after `failed_attempts` failures, with `unit` (in `[0, 1)`)
    /// choosing where in the jitter band it falls.
    pub fn delay_with(&self, failed_attempts: u32, unit: f64) -> Duration {
        let exponent = failed_attempts.saturating_sub(1).min(62);
        let raw = self.base.as_secs_f64() * 2f64.powi(exponent as i32);
        let capped = raw.min(self.max.as_secs_f64());
        let jitter = self.jitter.clamp(0.0, 1.0);
        let factor = 1.0 - jitter + 2.0 * jitter * unit.clamp(0.0, 1.0);
        Duration::from_secs_f64((capped * factor).max(0.0))
    }

    /// The delay after `failed_attempts` failures, with random jitter.
    pub fn delay(&self, failed_attempts: u32) -> Duration {
        self.delay_with(failed_attempts, rand::random::<f64>())
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Self::DEFAULT_BASE,
            max: Self::DEFAULT_MAX,
            jitter: Self::DEFAULT_JITTER,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_jitter() -> Backoff {
        Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
            jitter: 0.0,
        }
    }

    #[test]
    fn doubles_per_failed_attempt() {
        let b = no_jitter();
        assert_eq!(b.delay_with(1, 0.5), Duration::from_secs(1));
        assert_eq!(b.delay_with(2, 0.5), Duration::from_secs(2));
        assert_eq!(b.delay_with(4, 0.5), Duration::from_secs(8));
    }

    #[test]
    fn capped_at_max_even_for_huge_counts() {
        let b = no_jitter();
        assert_eq!(b.delay_with(7, 0.5), Duration::from_secs(60));
        assert_eq!(b.delay_with(u32::MAX, 0.5), Duration::from_secs(60));
    }

    #[test]
    fn zero_failures_is_the_base_delay() {
        assert_eq!(no_jitter().delay_with(0, 0.0), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_in_its_band() {
        let b = Backoff {
            jitter: 0.2,
            ..no_jitter()
        };
        assert_eq!(b.delay_with(3, 0.0), Duration::from_secs_f64(3.2));
        assert_eq!(b.delay_with(3, 1.0), Duration::from_secs_f64(4.8));
        for _ in 0..1000 {
            let d = b.delay(3).as_secs_f64();
            assert!((3.2..=4.8).contains(&d), "{d}");
        }
    }
}
