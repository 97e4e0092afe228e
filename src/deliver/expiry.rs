//! When a channel's token runs out, on the runtime's clock.
//!
//! A token's `exp` is wall-clock time (Unix seconds). A session reads the wall
//! clock once, when it starts, and from then on measures time with tokio's
//! monotonic clock: a token expiring at `exp` is due at
//! `start + (exp - wall_clock_at_start)`. So expiry is one `sleep_until` per
//! deadline — no polling, no busy loop in the last second before `exp` — and a
//! test with paused time (`tokio::time::pause`) drives it by advancing tokio's
//! clock. A wall-clock step (NTP) during a connection does not move its deadlines.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// The wall clock read once, paired with the runtime clock at that moment.
#[derive(Debug, Clone, Copy)]
pub struct ExpiryClock {
    /// Unix time in milliseconds when the clock was made.
    unix_ms: i64,
    /// The runtime's clock at the same moment.
    at: Instant,
}

/// Deadlines further out than this are treated as this far (no overflow).
const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

impl ExpiryClock {
    /// Reads the wall clock now.
    pub fn now() -> ExpiryClock {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        ExpiryClock::at(unix_ms, Instant::now())
    }

    /// A clock that reads `unix_ms` at `at` (for tests).
    pub fn at(unix_ms: i64, at: Instant) -> ExpiryClock {
        ExpiryClock { unix_ms, at }
    }

    /// When a token with `exp` (Unix seconds) is due, on the runtime's clock.
    pub fn deadline(&self, exp: i64) -> Instant {
        let left_ms = exp.saturating_mul(1000).saturating_sub(self.unix_ms);
        let left = Duration::from_millis(u64::try_from(left_ms).unwrap_or(0)).min(FAR);
        self.at + left
    }

    /// Whether a token with `exp` has expired by now.
    pub fn expired(&self, exp: i64) -> bool {
        self.deadline(exp) <= Instant::now()
    }
}

/// Sleeps until `at`; never returns for `None`.
pub async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn deadlines_follow_the_runtime_clock() {
        let start = Instant::now();
        let clock = ExpiryClock::at(1_000_500, start);
        // exp 1010 s is 9.5 s after 1000.5 s.
        assert_eq!(clock.deadline(1010), start + Duration::from_millis(9500));
        // Already past: due now.
        assert_eq!(clock.deadline(900), start);
        assert!(clock.expired(900));
        assert!(!clock.expired(1010));
        tokio::time::advance(Duration::from_millis(9499)).await;
        assert!(!clock.expired(1010));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(clock.expired(1010));
        // Absurd expiries neither overflow nor panic.
        assert!(!clock.expired(i64::MAX));
        assert!(clock.expired(i64::MIN));
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_until_wakes_at_the_deadline() {
        let start = Instant::now();
        let clock = ExpiryClock::at(0, start);
        sleep_until(Some(clock.deadline(30))).await;
        assert_eq!(Instant::now() - start, Duration::from_secs(30));
        let never = tokio::time::timeout(Duration::from_secs(3600), sleep_until(None)).await;
        assert!(never.is_err());
    }
}
