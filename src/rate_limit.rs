//! `RateLimiter`: a dataset's rate limit, enforced from rows.
//!
//! # The algorithm: a sliding log
//!
//! Every start of a task of a rate-limited dataset (every attempt, counted
//! or not) appends `(dataset_id, started_at)` to `syncq.rate_log`, written by
//! the claim in the same statement that starts the task. A claim may start
//! at most `rate_limit - (starts in (now - rate_window, now])` more tasks of
//! the dataset, counted while the claim holds the dataset's row lock and with
//! a snapshot taken after it (see `syncq.claim()`), with `now` the database's
//! `clock_timestamp()`. Hence, for **any** interval of length `rate_window`
//! — not only aligned buckets — at most `rate_limit` tasks start in it, across
//! every process, and a restart forgets nothing.
//!
//! Why not GCRA or a token bucket: those keep O(1) state, but a bucket that
//! allows a burst of `rate_limit` also allows up to `2 × rate_limit - 1`
//! starts in some interval of `rate_window` (a burst at the end of one window
//! and refills right after), which breaks the sliding guarantee; making them
//! strict forbids bursts altogether. The log costs one small row per start
//! and a bounded count per claim (at most `rate_limit` index entries), and
//! allows the bursts the guarantee permits: all `rate_limit` starts at once,
//! then the next one when the oldest leaves the window.
//!
//! Rows older than their window no longer count; every worker's maintenance
//! sweep deletes them through `RateLimiter::prune_log`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::db::Db;

use crate::error::{Error, Result};
use crate::store;
use crate::store::datasets::LimitsChange;

/// `limit` task starts in any interval of length `window`.
///
/// ```
/// use syncq::RateLimit;
/// let r: RateLimit = "100/1s".parse().unwrap();
/// assert_eq!((r.limit, r.window.as_millis()), (100, 1000));
/// assert_eq!(r.to_string(), "100/1s");
/// assert!("5/0s".parse::<RateLimit>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Starts allowed per window, 1 to `MAX_LIMIT`.
    pub limit: u32,
    /// The window, 1 ms to `MAX_WINDOW`.
    pub window: Duration,
}

impl RateLimit {
    /// The largest `limit` (the table's constraint).
    pub const MAX_LIMIT: u32 = 1_000_000;
    /// The longest `window` (the table's constraint).
    pub const MAX_WINDOW: Duration = Duration::from_secs(86_400);

    /// A checked rate limit; the error says which part is out of range.
    pub fn new(limit: u32, window: Duration) -> Result<Self> {
        if limit == 0 || limit > Self::MAX_LIMIT {
            return Err(Error::config(
                "rate_limit",
                format!("must be between 1 and {}, got {limit}", Self::MAX_LIMIT),
            ));
        }
        if window < Duration::from_millis(1) || window > Self::MAX_WINDOW {
            return Err(Error::config(
                "rate_window",
                format!("must be between 1ms and 1 day, got {window:?}"),
            ));
        }
        Ok(RateLimit { limit, window })
    }

    /// `limit` starts per second.
    pub fn per_second(limit: u32) -> Result<Self> {
        Self::new(limit, Duration::from_secs(1))
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let window = humantime::format_duration(self.window).to_string();
        write!(f, "{}/{}", self.limit, window.replace(' ', ""))
    }
}

impl FromStr for RateLimit {
    type Err = String;

    /// `N/DURATION`, e.g. `100/1s`, `5/500ms`, `1000/1m`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (limit, window) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a rate: expected N/DURATION, e.g. 100/1s"))?;
        let limit: u32 = limit
            .trim()
            .parse()
            .map_err(|_| format!("{limit:?} is not a whole number of starts (in {s:?})"))?;
        let window = humantime::parse_duration(window.trim())
            .map_err(|e| format!("{window:?} is not a duration ({e}), in {s:?}"))?;
        RateLimit::new(limit, window).map_err(|e| e.to_string())
    }
}

/// One dataset's rate limiter, kept in its `syncq.datasets` row and
/// `syncq.rate_log`. Changes take effect at the next claim of any process.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    db: Db,
    dataset_id: String,
}

impl RateLimiter {
    /// Deletes the rate log's rows that left their dataset's window, in
    /// statements of `batch` rows, until none is left. Returns how many.
    pub(crate) async fn prune_log(db: &Db, batch: i64) -> sqlx::Result<u64> {
        let batch = i32::try_from(batch).unwrap_or(i32::MAX);
        let mut pruned = 0;
        loop {
            let n = store::rate_log::prune_rate_log(db, batch).await?;
            pruned += n.unsigned_abs();
            if n < i64::from(batch) {
                return Ok(pruned);
            }
        }
    }

    /// The limiter of `dataset_id`.
    pub fn new(db: impl Into<Db>, dataset_id: impl Into<String>) -> Self {
        RateLimiter {
            db: db.into(),
            dataset_id: dataset_id.into(),
        }
    }

    /// The current limit (`None`: unlimited).
    pub async fn limit(&self) -> Result<Option<RateLimit>> {
        let row = store::datasets::get(&self.db, &self.dataset_id).await?;
        Ok(row.and_then(|r| {
            r.rate_limit.map(|n| RateLimit {
                limit: u32::try_from(n).unwrap_or(0),
                window: Duration::from_secs_f64(r.rate_window_secs.max(0.0)),
            })
        }))
    }

    /// Sets (or with `None` clears) the limit, creating the dataset's row if
    /// needed.
    pub async fn set(&self, limit: Option<RateLimit>) -> Result<()> {
        let rate = limit.map(|r| (i32::try_from(r.limit).unwrap_or(i32::MAX), r.window));
        let change = LimitsChange {
            rate: Some(rate),
            ..LimitsChange::default()
        };
        store::datasets::set_limits(&self.db, &self.dataset_id, change).await?;
        Ok(())
    }

    /// Starts counted in the current window.
    pub async fn starts_in_window(&self) -> Result<i64> {
        Ok(store::datasets::counts(&self.db, &self.dataset_id)
            .await?
            .starts_in_window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn display_then_parse_is_the_identity(limit in 1u32..=RateLimit::MAX_LIMIT, ms in 1u64..=86_400_000) {
            let rate = RateLimit::new(limit, Duration::from_millis(ms)).unwrap();
            prop_assert_eq!(rate.to_string().parse::<RateLimit>(), Ok(rate));
        }

        #[test]
        fn out_of_range_is_refused(limit in (RateLimit::MAX_LIMIT + 1)..u32::MAX) {
            prop_assert!(RateLimit::new(limit, Duration::from_secs(1)).is_err());
            let text = format!("{}/1s", limit);
            prop_assert!(text.parse::<RateLimit>().is_err());
        }

        #[test]
        fn parsing_never_panics(s in ".{0,20}") {
            let _ = s.parse::<RateLimit>();
        }
    }

    #[test]
    fn bad_rates_say_what_is_wrong() {
        for (input, says) in [
            ("5/0s", "rate_window"),
            ("0/1s", "rate_limit"),
            ("ten/1s", "whole number"),
            ("10", "N/DURATION"),
            ("10/soon", "duration"),
            ("10/2days", "rate_window"),
        ] {
            let err = input.parse::<RateLimit>().unwrap_err();
            assert!(err.contains(says), "{input}: {err}");
        }
    }
}
