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
    /// Stop (as after a checkpoint) once no task this pool could run is
    /// queued or running anywhere: a batch-job mode for scripts and tests.
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

    /// Checks every field; the error names the first one out of range.
    pub fn validate(&self) -> Result<()> {
        if self.concurrency == 0 || self.concurrency > 10_000 {
            return Err(Error::config(
                "concurrency",
                format!("must be between 1 and 10000, got {}", self.concurrency),
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
        let positive = [
            ("lease", self.lease),
            ("heartbeat", self.heartbeat),
            ("poll_interval", self.poll_interval),
            ("rescue_interval", self.rescue_interval),
        ];
        for (field, value) in positive {
            if value.is_zero() {
                return Err(Error::config(field, "must be greater than zero"));
            }
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
}
