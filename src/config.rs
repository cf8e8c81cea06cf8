//! `PoolConfig`: a plain struct with defaults and `validate()`.

use std::time::Duration;

use crate::backoff::Backoff;
use crate::error::{Error, Result};

/// How a `WorkerPool` runs. Start from `PoolConfig::default()` and change
/// what you need; `WorkerPool::builder` validates it.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    /// Handlers running at once in this process.
    pub concurrency: usize,
    /// Only claim tasks of these datasets (None: all).
    pub datasets: Option<Vec<String>>,
    /// How long a claim holds a task without a heartbeat. After that, any
    /// process may take it back (the attempt counts).
    pub lease: Duration,
    /// How often the pool renews its leases and its registry row. Must be
    /// shorter than `lease`.
    pub heartbeat: Duration,
    /// How often an idle pool looks for work without being woken: the
    /// longest a delayed or retrying task waits past its `run_at`.
    pub poll_interval: Duration,
    /// Wake on LISTEN/NOTIFY. Turn off behind a transaction-mode connection
    /// pooler (PgBouncer), which cannot LISTEN; the pool then polls.
    pub listen: bool,
    /// How long running handlers get to save progress after a checkpoint
    /// command before they are aborted (their tasks are released all the same).
    pub shutdown_grace: Duration,
    /// How often this process looks for expired leases to take back.
    pub rescue_interval: Duration,
    /// Retry delays after failed attempts.
    pub backoff: Backoff,
    /// The throttle applied when a handler reports `RateLimited` without a
    /// `retry_after`.
    pub default_retry_after: Duration,
    /// Stop (as after a checkpoint) once idle: no task this pool could run
    /// is running anywhere, and none is queued that becomes claimable
    /// within [`IDLE_HORIZON`](Self::IDLE_HORIZON) without an operator (a
    /// retry's backoff, a throttle or a rate budget is waited for; a
    /// paused dataset, or a task delayed past the horizon, is not). What
    /// is left is logged once. A batch-job mode for scripts and tests.
    pub exit_when_idle: bool,
    /// Delete finished tasks this long after they finished (in batches, by
    /// every process's maintenance sweep). None keeps them forever.
    pub retention: Option<Duration>,
    /// `VACUUM (ANALYZE)` syncq's tables from the maintenance loop once
    /// enough of their rows are dead (one process at a time). Needed where
    /// autovacuum is off or too slow for the queue's churn; harmless
    /// otherwise, and a no-op for a role that does not own the tables.
    pub vacuum: bool,
    /// Sample queue depth, running count and oldest-ready age per dataset
    /// from SQL this often, as metrics gauges (see [`crate::metrics`]).
    /// None: no sampling (the default; `syncq worker --metrics-addr` sets
    /// 5 s).
    pub metrics_sample_interval: Option<Duration>,
    /// How long this pool leaves out a dataset whose claims fail because of
    /// its own rows (the log names it), so it cannot stop the others being
    /// served; then the pool tries it again.
    pub set_aside: Duration,
    /// The most tasks this pool leases ahead of its free slots (its local
    /// queue), started in claim order as slots free. A task leased ahead
    /// is not started: it stays `queued` (in this worker's name, its lease
    /// renewed as a running task's), is no attempt, and starts only if,
    /// once a slot is free, this pool has not heard it cancelled or its
    /// dataset paused; one that waits longer than
    /// [`AHEAD_WAIT`](Self::AHEAD_WAIT) is given back to the fleet. Its
    /// start is written with its end, or after
    /// [`START_WRITE_DELAY`](Self::START_WRITE_DELAY) if it runs longer. Only datasets without a cap or rate
    /// limit are leased ahead: a limited dataset's tasks are claimed for
    /// free slots and start at once, so their limits hold where the
    /// handlers run. How many it actually takes follows its own pace: about
    /// [`PREFETCH_HORIZON`](Self::PREFETCH_HORIZON) of its recent
    /// completions, so short tasks drain in few, large claims while a pool
    /// of slow tasks keeps nothing waiting. 0: claim only for free slots.
    pub prefetch: usize,
}

/// The range a duration setting must lie in: every flag and field has one,
/// so no value can overflow a computation or make every claim fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationRange {
    /// Smallest allowed value.
    pub min: Duration,
    /// Largest allowed value.
    pub max: Duration,
}

const fn range(min: Duration, max: Duration) -> DurationRange {
    DurationRange { min, max }
}

const MS: Duration = Duration::from_millis(1);
const SECOND: Duration = Duration::from_secs(1);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

impl DurationRange {
    /// Whether `value` is in the range.
    pub fn contains(&self, value: Duration) -> bool {
        self.min <= value && value <= self.max
    }

    /// The error for a value out of range, naming `field`.
    pub fn check(&self, field: &'static str, value: Duration) -> Result<()> {
        if self.contains(value) {
            return Ok(());
        }
        Err(Error::config(
            field,
            format!("must be {}, got {}", self.describe(), show(value)),
        ))
    }

    /// Parses a duration such as `500ms`, `30s`, `5m`, `7d` and checks the
    /// range: what the CLI's duration flags use.
    pub fn parse(&self, text: &str) -> std::result::Result<Duration, String> {
        let value = humantime::parse_duration(text)
            .map_err(|e| format!("{e} (expected e.g. 500ms, 30s, 5m, 7d)"))?;
        if self.contains(value) {
            Ok(value)
        } else {
            Err(format!("must be {}, got {text}", self.describe()))
        }
    }

    /// "between 100ms and 1day".
    pub fn describe(&self) -> String {
        format!("between {} and {}", show(self.min), show(self.max))
    }
}

fn show(d: Duration) -> String {
    if d.is_zero() {
        "0s".to_string()
    } else {
        humantime::format_duration(d).to_string()
    }
}

impl PoolConfig {
    /// Default `concurrency`.
    pub const DEFAULT_CONCURRENCY: usize = 10;
    /// Default `lease`.
    pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
    /// Default `heartbeat`.
    pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
    /// Default `poll_interval`.
    pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
    /// Default `shutdown_grace`.
    pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
    /// Default `rescue_interval`.
    pub const DEFAULT_RESCUE_INTERVAL: Duration = Duration::from_secs(5);
    /// Default `default_retry_after`.
    pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);
    /// Default `set_aside`.
    pub const DEFAULT_SET_ASIDE: Duration = Duration::from_secs(60);
    /// With `exit_when_idle`: work due within this long is waited for.
    pub const IDLE_HORIZON: Duration = Duration::from_secs(60);
    /// Default `prefetch`.
    pub const DEFAULT_PREFETCH: usize = 500;
    /// How long, at its recent pace, a pool's prefetched tasks may take to
    /// reach a slot: the local queue holds about this much work.
    pub const PREFETCH_HORIZON: Duration = Duration::from_millis(50);
    /// The longest a task leased ahead waits here for a slot: then it is
    /// given back (claimable by any worker, idle ones woken), so no task
    /// waits behind a long one in one process while a slot is free
    /// elsewhere. Well under the default poll interval.
    pub const AHEAD_WAIT: Duration = Duration::from_millis(500);
    /// How long the handler of a task leased ahead runs before its start
    /// (`running`, the attempt counted, `started_at` when the handler
    /// began) is written on its own: a shorter one has its start written
    /// with its end, in the same statement, so a drain of short tasks
    /// writes each row twice (lease, end), as when the claim started them.
    pub const START_WRITE_DELAY: Duration = Duration::from_millis(10);

    /// `lease`: long enough to be renewed, short enough that a dead
    /// worker's tasks come back the same day.
    pub const LEASE_RANGE: DurationRange = range(Duration::from_millis(100), DAY);
    /// `heartbeat` (and it must be shorter than `lease`).
    pub const HEARTBEAT_RANGE: DurationRange = range(Duration::from_millis(10), DAY);
    /// `poll_interval`.
    pub const POLL_INTERVAL_RANGE: DurationRange = range(MS, HOUR);
    /// `rescue_interval`.
    pub const RESCUE_INTERVAL_RANGE: DurationRange = range(Duration::from_millis(10), HOUR);
    /// `shutdown_grace`.
    pub const SHUTDOWN_GRACE_RANGE: DurationRange = range(Duration::ZERO, HOUR);
    /// `default_retry_after` (the longest throttle, as
    /// [`TaskError::MAX_RETRY_AFTER`](crate::TaskError::MAX_RETRY_AFTER)).
    pub const RETRY_AFTER_RANGE: DurationRange = range(Duration::ZERO, DAY);
    /// `syncq worker --backoff`: the first retry's delay, up to the default
    /// maximum of the doubling ([`Backoff::DEFAULT_MAX`](crate::Backoff::DEFAULT_MAX)).
    pub const BACKOFF_BASE_RANGE: DurationRange = range(Duration::ZERO, HOUR);
    /// `backoff.base` and `backoff.max`.
    pub const BACKOFF_RANGE: DurationRange = range(Duration::ZERO, Duration::from_secs(7 * 86_400));
    /// `retention` (about 100 years at most).
    pub const RETENTION_RANGE: DurationRange = range(SECOND, Duration::from_secs(36_500 * 86_400));
    /// `syncq prune --older-than`.
    pub const PRUNE_AGE_RANGE: DurationRange =
        range(Duration::ZERO, Duration::from_secs(36_500 * 86_400));
    /// `metrics_sample_interval`.
    pub const METRICS_SAMPLE_RANGE: DurationRange = range(Duration::from_millis(100), HOUR);
    /// `set_aside`.
    pub const SET_ASIDE_RANGE: DurationRange = range(Duration::from_millis(10), HOUR);

    /// Checks every field; the error names the first one out of range.
    pub fn validate(&self) -> Result<()> {
        if self.concurrency == 0 || self.concurrency > 10_000 {
            return Err(Error::config(
                "concurrency",
                format!("must be between 1 and 10000, got {}", self.concurrency),
            ));
        }
        if self.prefetch > 10_000 {
            return Err(Error::config(
                "prefetch",
                format!("must be between 0 and 10000, got {}", self.prefetch),
            ));
        }
        if let Some(datasets) = &self.datasets
            && (datasets.is_empty() || datasets.iter().any(|d| d.is_empty()))
        {
            return Err(Error::config(
                "datasets",
                "must name at least one dataset, none empty",
            ));
        }
        Self::LEASE_RANGE.check("lease", self.lease)?;
        Self::HEARTBEAT_RANGE.check("heartbeat", self.heartbeat)?;
        Self::POLL_INTERVAL_RANGE.check("poll_interval", self.poll_interval)?;
        Self::RESCUE_INTERVAL_RANGE.check("rescue_interval", self.rescue_interval)?;
        Self::SHUTDOWN_GRACE_RANGE.check("shutdown_grace", self.shutdown_grace)?;
        Self::RETRY_AFTER_RANGE.check("default_retry_after", self.default_retry_after)?;
        Self::BACKOFF_RANGE.check("backoff.base", self.backoff.base)?;
        Self::BACKOFF_RANGE.check("backoff.max", self.backoff.max)?;
        Self::SET_ASIDE_RANGE.check("set_aside", self.set_aside)?;
        if let Some(retention) = self.retention {
            Self::RETENTION_RANGE.check("retention", retention)?;
        }
        if let Some(every) = self.metrics_sample_interval {
            Self::METRICS_SAMPLE_RANGE.check("metrics_sample_interval", every)?;
        }
        if let Some(datasets) = &self.datasets
            && datasets.iter().any(|d| d.contains('\0'))
        {
            return Err(Error::config(
                "datasets",
                "must not contain a NUL character",
            ));
        }
        if self.heartbeat >= self.lease {
            return Err(Error::config(
                "heartbeat",
                format!(
                    "must be shorter than the lease ({:?}), got {:?}",
                    self.lease, self.heartbeat
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.backoff.jitter) {
            return Err(Error::config("backoff.jitter", "must be between 0 and 1"));
        }
        if self.backoff.base > self.backoff.max {
            return Err(Error::config("backoff.base", "must not exceed backoff.max"));
        }
        Ok(())
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            concurrency: Self::DEFAULT_CONCURRENCY,
            datasets: None,
            lease: Self::DEFAULT_LEASE,
            heartbeat: Self::DEFAULT_HEARTBEAT,
            poll_interval: Self::DEFAULT_POLL_INTERVAL,
            listen: true,
            shutdown_grace: Self::DEFAULT_SHUTDOWN_GRACE,
            rescue_interval: Self::DEFAULT_RESCUE_INTERVAL,
            backoff: Backoff::default(),
            default_retry_after: Self::DEFAULT_RETRY_AFTER,
            exit_when_idle: false,
            retention: None,
            vacuum: true,
            metrics_sample_interval: None,
            set_aside: Self::DEFAULT_SET_ASIDE,
            prefetch: Self::DEFAULT_PREFETCH,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        PoolConfig::default().validate().unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        let bad = PoolConfig {
            heartbeat: Duration::from_secs(40),
            ..Default::default()
        };
        let msg = bad.validate().unwrap_err().to_string();
        assert!(msg.contains("heartbeat"), "{msg}");

        let bad = PoolConfig {
            concurrency: 0,
            ..Default::default()
        };
        let msg = bad.validate().unwrap_err().to_string();
        assert!(msg.contains("concurrency"), "{msg}");
    }

    #[test]
    fn huge_durations_are_refused_not_overflowed() {
        let years = Duration::from_secs(500_000_000_000 * 31_557_600 / 1_000_000);
        for (field, config) in [
            (
                "lease",
                PoolConfig {
                    lease: years,
                    ..Default::default()
                },
            ),
            (
                "rescue_interval",
                PoolConfig {
                    rescue_interval: years,
                    ..Default::default()
                },
            ),
            (
                "retention",
                PoolConfig {
                    retention: Some(years),
                    ..Default::default()
                },
            ),
            (
                "backoff.max",
                PoolConfig {
                    backoff: Backoff {
                        max: years,
                        ..Default::default()
                    },
                    ..Default::default()
                },
            ),
        ] {
            let msg = config.validate().unwrap_err().to_string();
            assert!(msg.contains(field) && msg.contains("between"), "{msg}");
        }
    }

    proptest::proptest! {
        #[test]
        fn parsed_durations_are_in_range_or_refused(text in "[0-9]{1,15}(ns|us|ms|s|m|h|d|w|y)") {
            let range = PoolConfig::LEASE_RANGE;
            match range.parse(&text) {
                Ok(d) => proptest::prop_assert!(range.contains(d)),
                Err(message) => proptest::prop_assert!(!message.is_empty()),
            }
        }
    }
}
